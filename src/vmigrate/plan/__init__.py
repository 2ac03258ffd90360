"""Pure planning: measurements and policies in, decisions out.

Nothing in this package does I/O; every function takes plain data and returns
plain data, so it is tested with synthetic inputs.

``vmigrate.plan.policy``
    Convergence policies for live migration (oVirt-style schedules as data),
    the QMP capabilities/parameters a migration starts with
    (:func:`~vmigrate.plan.policy.plan_setup`), and the controller that turns
    ``query-migrate`` samples into actions
    (:class:`~vmigrate.plan.policy.ConvergenceController`).
"""
