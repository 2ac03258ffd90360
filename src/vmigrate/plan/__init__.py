"""Pure planning: measurements and policies in, decisions out.

Nothing in this package does I/O; every function takes plain data and returns
plain data, so it is tested with synthetic inputs.

``vmigrate.plan.policy``
    Convergence policies for live migration (oVirt-style schedules as data):
    the built-ins and the inventory's ``[policies.NAME]`` tables.
``vmigrate.plan.capabilities``
    The QMP capabilities/parameters a migration starts with
    (:func:`~vmigrate.plan.capabilities.plan_setup`), refusing what the running
    QEMU cannot do.
``vmigrate.plan.convergence``
    The controller that turns ``query-migrate`` samples into actions
    (:class:`~vmigrate.plan.convergence.ConvergenceController`).
``vmigrate.plan.simulate``
    A pre-copy/post-copy migration in simulated time, answering like QEMU 7.2's
    ``query-migrate``: the live model drives the real controller against it.
``vmigrate.plan.assessment``
    What ``vmigrate assess`` measured, and what a prediction says (JSON models).
``vmigrate.plan.predict``
    Per-mode models (live, online, cold, warm) and their calibration from
    migrations already measured.
``vmigrate.plan.decide``
    The weighted decision matrix, tiers, and the explanation of a choice.
``vmigrate.plan.window``
    The best time of day to migrate, from the assessment history.
"""
