"""The tamper-evident audit log: every migration step, hash-chained and signed, one JSON
line each.

Public surface: :class:`AuditLog` (append), :func:`check_appendable` (before work that
will append), :func:`verify` (chain, signatures, and the :class:`Claim` s others hold:
job heads, host witnesses), :func:`repair` (a torn last line only), :func:`read`,
:class:`AuditRecord`, :class:`VerifyResult`, :class:`RepairResult`; the controller's key
(:func:`load_signing_key`, :func:`load_public_key`, :class:`PublicKey`); witnesses
(:mod:`vmigrate.audit.witness`). The log lives at
``vmigrate.config.state_home() / AUDIT_FILENAME``, the key next to it.
"""

from vmigrate.audit.keys import (
    PRIVATE_NAME,
    PUBLIC_NAME,
    PublicKey,
    SigningKey,
    load_public_key,
    load_signing_key,
)
from vmigrate.audit.log import (
    GENESIS,
    REPAIR_EVENT,
    VERSION,
    VERSIONS,
    AuditLog,
    AuditRecord,
    Claim,
    RepairResult,
    VerifyResult,
    check_appendable,
    parse_line,
    read,
    repair,
    verify,
)

#: the log's file name inside $VMIGRATE_HOME
AUDIT_FILENAME = "audit.jsonl"

__all__ = [
    "AUDIT_FILENAME",
    "GENESIS",
    "PRIVATE_NAME",
    "PUBLIC_NAME",
    "REPAIR_EVENT",
    "VERSION",
    "VERSIONS",
    "AuditLog",
    "AuditRecord",
    "Claim",
    "PublicKey",
    "RepairResult",
    "SigningKey",
    "VerifyResult",
    "check_appendable",
    "load_public_key",
    "load_signing_key",
    "parse_line",
    "read",
    "repair",
    "verify",
]
