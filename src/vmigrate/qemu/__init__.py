"""QEMU: VM spec to command line, process lifecycle on a host, typed QMP session."""
