"""The hooks a mezo-run plugin can implement.

A plugin is a plain module (or object) with functions marked ``@hookimpl`` and
listed under the ``mezo`` entry-point group of its distribution, e.g.::

    [project.entry-points.mezo]
    my_backend = "my_package.plugin"

The built-in plugins (``mezo_builtin``, ``mezo_backend_hf``, ...) are found the
same way, so a third-party package is a first-class citizen.

Every ``register_*`` hook gets one ``register(cls)``: the class's ``name`` is what
users write (``backend=...``, ``report_to: [...]``, ``mezo.lr_schedule=...``).

A class of any kind may declare its settings as a dataclass, like llm's ``Options``;
each field's ``metadata["help"]`` is its meaning in ``mezo-run config --reference``::

    @dataclass
    class MyOptions:
        width: int = field(default=4, metadata={"help": "how wide"})  # or setting(4, "how wide")

    class MyBackend(Backend):
        name = "mine"
        options: ClassVar[type] = MyOptions

The run config then has a typed ``mine`` section (``mezo-run train backend=mine
mine.width=8``): unknown keys and wrong types are refused with the file, line and
field, like the core's own. The plugin reads it with ``mezo_core.config.plugin_options
(cfg, cls)``; an eviction policy with options is built as ``cls(options)``. A backend
without ``options`` gets a free-form section that it checks itself (engine settings
passed through); other plugins without one get no section. A schedule's options are
read, by the same checks, from ``mezo.lr_schedule_options`` / ``mezo.eps_schedule_options``
rather than a section of its own (one schedule class may drive both, differently),
and it is built as ``cls(start, end, warmup_steps, options)``.
"""
import pluggy

hookspec = pluggy.HookspecMarker("mezo")
hookimpl = pluggy.HookimplMarker("mezo")


@hookspec
def register_backends(register):
    """Register backend classes: ``register(BackendSubclass)``.

    The class's ``name`` attribute is the value users put in ``backend=...``; the
    run builds it as ``BackendSubclass(cfg, registry)`` (the registry: for its own
    plugin lookups, e.g. an eviction policy). Do not import heavy engines here; do
    it in the backend's ``__init__``.
    """


@hookspec
def register_eviction_policies(register):
    """Register cache eviction policies: ``register(EvictionPolicySubclass)``."""


@hookspec
def register_epsilon_schedules(register):
    """Register schedules: ``register(ScheduleSubclass)``.

    The same schedules drive the learning rate (``mezo.lr_schedule``) and the
    perturbation size (``mezo.eps_schedule``); a schedule's ``options`` dataclass
    is filled from ``mezo.lr_schedule_options`` / ``mezo.eps_schedule_options``.
    """


@hookspec
def register_loggers(register):
    """Register metric loggers: ``register(LoggerClass)``; ``report_to: [LoggerClass.name]`` picks them.

    ``LoggerClass(out_dir, cfg, start_step)`` is made on the writing rank when a run
    starts (``start_step`` > 0 on ``--resume``: drop rows written after it, the run
    writes them again); ``log(step, metrics)`` gets every training step's row and
    every evaluation's rows (``"event": "eval"``); ``close()`` ends the run. An
    optional classmethod ``unavailable_reason()`` returns why it cannot run here.
    """


@hookspec
def register_estimators(register):
    """Register estimators: ``register(EstimatorSubclass)`` (``mezo_core.Estimator``).

    ``mezo.estimator`` picks one: how a step's forwards become an update. It is
    built as ``cls(options)``, its ``options`` dataclass filled from
    ``mezo.estimator_options`` (None for one that declares none).
    """


@hookspec
def register_rewards(register):
    """Register rewards: ``register(RewardSubclass)`` (``mezo_core.rewards.Reward``).

    ``task.reward`` picks one for a reward task (``task.kind=reward``): it scores
    each generated completion against its row's reference (``score(completion,
    reference) -> float``, higher is better). It is built as ``cls(options)``, its
    ``options`` dataclass filled from ``task.reward_options`` (None for one that
    declares none).
    """


@hookspec
def on_step_end(step, metrics):
    """Called after every optimisation step with the metrics dict that is also
    written to ``metrics.jsonl``. Loggers (W&B, TensorBoard, ...) hook in here.
    With ``mezo.fuse_steps`` the weights may already carry the next step's +eps*z
    here; they are clean where the run evaluates, checkpoints or ends."""
