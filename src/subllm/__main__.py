import sys

from subllm.cli import main

sys.exit(main())
