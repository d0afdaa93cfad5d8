"""The CLI verbs: one module each, with `DESCRIPTION`, `add_arguments(parser)` and
`run(args)` (see `subllm.cli`). Modules here import only light code at the top; `run`
imports what the verb drives."""
