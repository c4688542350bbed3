"""The command-line tools, one module per command with `run(config, workdir)` (the work) and
`main()` (the console entry point of pyproject's [project.scripts], e.g. `safealign-train`).
`scripts/NAME.py` in the checkout calls the same `main`.
"""
