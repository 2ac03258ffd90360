"""The tamper-evident audit log: every migration step, hash-chained, one JSON line each.

Public surface: :class:`AuditLog` (append), :func:`check_appendable` (before work that
will append), :func:`verify`, :func:`repair` (a torn last line only), :func:`read`,
:class:`AuditRecord`, :class:`VerifyResult`, :class:`RepairResult`. The log lives at
``vmigrate.config.state_home() / AUDIT_FILENAME``.
"""

from vmigrate.audit.log import (
    GENESIS,
    REPAIR_EVENT,
    VERSION,
    AuditLog,
    AuditRecord,
    RepairResult,
    VerifyResult,
    check_appendable,
    read,
    repair,
    verify,
)

#: the log's file name inside $VMIGRATE_HOME
AUDIT_FILENAME = "audit.jsonl"

__all__ = [
    "AUDIT_FILENAME",
    "GENESIS",
    "REPAIR_EVENT",
    "VERSION",
    "AuditLog",
    "AuditRecord",
    "RepairResult",
    "VerifyResult",
    "check_appendable",
    "read",
    "repair",
    "verify",
]
