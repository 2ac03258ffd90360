"""The embedded lab: namespaced hosts, shaped links, guest image, probes."""
