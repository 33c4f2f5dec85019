"""The programs a scenario starts as separate processes: `python -m bench.workers.<name> --help`.

Listeners take their port on the command line (the harness picks free ones and waits for them with
`bench.procs.wait_listening`); results are JSON lines on stdout; diagnostics go to stderr.
"""
