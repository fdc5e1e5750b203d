"""`memwise bench`: speed and peak memory of language models, one fresh process per measured cell.

cli.py (flags, progress) -> suites.py (which cells) -> sources.py (real weights or a preset) ->
runner.py (memory estimate and skip checks from memory.py, then one process per cell, started by
launcher.py) -> cell.py (in that process: load, warm up, time; the engines are in engines.py) ->
report.py (terminal table, results.json/.csv/.md, plots). machine.py records the machine and its
memory bandwidth. Nothing here is imported by `import memwise`.
"""
