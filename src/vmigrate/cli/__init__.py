"""The ``vmigrate`` command line: parse, call a service, render."""
