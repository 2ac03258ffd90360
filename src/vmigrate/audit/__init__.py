"""The tamper-evident audit log: every migration step, hash-chained, one JSON line each.

Public surface: :class:`AuditLog` (append), :func:`verify`, :func:`read`,
:class:`AuditRecord`, :class:`VerifyResult`. The log lives at
``vmigrate.config.state_home() / AUDIT_FILENAME``.
"""

from vmigrate.audit.log import (
    GENESIS,
    VERSION,
    AuditLog,
    AuditRecord,
    VerifyResult,
    read,
    verify,
)

#: the log's file name inside $VMIGRATE_HOME
AUDIT_FILENAME = "audit.jsonl"

__all__ = [
    "AUDIT_FILENAME",
    "GENESIS",
    "VERSION",
    "AuditLog",
    "AuditRecord",
    "VerifyResult",
    "read",
    "verify",
]
