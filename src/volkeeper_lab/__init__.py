"""Scaffolding around volkeeper, not part of it: local nodes for the demo, tests and benchmarks.

``launcher`` starts ``volkeeper daemon`` processes in a directory of their own (config, volumes,
sockets, free ports) and stops them by PID; ``demo`` is ``make demo``.  The product package
(``volkeeper``) never imports this one.
"""
