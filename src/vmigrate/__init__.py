"""vmigrate: a migration control plane for QEMU/KVM virtual machines."""

import warnings

__version__ = "0.1.0"

# asyncssh still supports DSA keys, which newer cryptography releases deprecate at import
# time: ten warning lines on stderr for every command, about a key type vmigrate never uses
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh(\.|$)")
