"""Loading a run's configuration: the schema (``schema.py``, plus each plugin's
section), YAML files from ``conf/`` and ``key=value`` overrides, then value checks.
Every mistake becomes a MezoError naming the file, line or field."""
from __future__ import annotations

import math
import re
import string
from dataclasses import field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, Dict, List

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import MezoError
from .interfaces import check_option_types
from .overrides import apply_override, describe, literal_escapes, replaceable
from .schema import (BEST_CORRECTIONS, DEFAULT_CONFIG, DEFAULT_RECIPE, MAX_LORA_R, MAX_Q,  # noqa: F401 (public)
                     MAX_TEMPLATE, MAX_THREADS, MIN_EPS, MOVED, QUANTIZATIONS, GuardConfig, LoraConfig,
                     MezoConfig, ModelConfig, RunConfig, SelectionConfig, TaskConfig, default_config,
                     recipes, recipes_dir, setting)


#: plugin kinds whose options are read from ``mezo.<choice>_options``, not a section named after the plugin
BESIDE_THE_CHOICE = ("epsilon_schedules", "estimators", "rewards")


def plugin_sections(registry) -> Dict[str, Any]:
    """Section name -> the options dataclass of the plugin of that name, or
    ``Dict[str, Any]`` for a backend without one (free-form: the backend checks its
    keys; none where its name is not an identifier). Plugins own their settings;
    the core only merges them in, by name. Schedules and estimators have no section:
    their settings sit beside the choice (``mezo.lr_schedule_options``,
    ``mezo.estimator_options``: ``choice_options``), since one schedule may drive
    both lr and eps, and a name such as fzoo is both a schedule and an estimator."""
    core = {f.name for f in fields(RunConfig)}
    sections: Dict[str, Any] = {}
    owners: Dict[str, str] = {}
    for kind, items in registry.items.items():
        if kind in BESIDE_THE_CHOICE:
            continue
        for name, entry in sorted(items.items()):
            options = getattr(entry.obj, "options", None)
            if options is None and (kind != "backends" or not name.isidentifier()):
                continue
            what = f"{registry.SINGULAR[kind]} {name!r} (plugin {entry.plugin!r})"
            if not name.isidentifier():
                raise MezoError(f"{what}: a plugin with options needs a name that can head a config "
                                f"section (letters, digits, _)")
            if options is not None and not (isinstance(options, type) and is_dataclass(options)):
                raise MezoError(f"{what}: its `options` must be a dataclass, not {options!r}")
            if name in core or name in owners:
                raise MezoError(f"{what}: its options section {name!r} is taken by "
                                f"{owners.get(name, 'the core config')}")
            owners[name] = what
            sections[name] = options or Dict[str, Any]
    return sections


def schema(registry) -> type:
    """RunConfig with every plugin section: the structure a run config is checked against."""
    extra = [(name, kind, field(default_factory=kind if is_dataclass(kind) else dict))
             for name, kind in plugin_sections(registry).items()]
    return make_dataclass("RunConfig", extra, bases=(RunConfig,))


def plugin_options(cfg, cls) -> Any:
    """A plugin's settings from the section named ``cls.name``: an instance of
    ``cls.options`` (its defaults where the config has no such section), else the
    free-form section as a dict."""
    section = cfg.get(cls.name) if hasattr(cfg, "get") else getattr(cfg, cls.name, None)
    options = getattr(cls, "options", None)
    if options is None:
        return dict(OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section)
                    else section or {})
    return options_from(options, section, cls.name)


def options_from(options: type, section, name: str, owner: str = "") -> Any:
    """An ``options`` dataclass from its config section ``name``: None (the defaults),
    an instance, a typed node (``load_config``'s) or a plain mapping (a schedule's
    ``mezo.lr_schedule_options``, tests, notebooks). A mapping gets the checks a typed
    node gets from the schema: unknown keys refused, an int taken as a float where the
    default is one, then every value of its default's type (``check_option_types``).
    Errors are one line naming ``name.key`` and, where the section's name does not say
    whose options these are, ``owner`` (e.g. "schedule 'rms'")."""
    whose = f" ({owner})" if owner else ""
    if section is None:
        return options()
    if isinstance(section, options):
        return section
    if OmegaConf.is_config(section) and OmegaConf.get_type(section) is options:
        try:
            return OmegaConf.to_object(section)
        except (ValueError, TypeError, OmegaConfBaseException) as exc:  # the dataclass's own checks
            raise MezoError(f"config field {name!r}{whose}: {_first_line(exc)}") from None
    values = dict(OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else section)
    known = {f.name: f for f in fields(options)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        keys = f"its keys: {', '.join(known)}" if known else "it takes none"
        raise MezoError(f"config field '{name}.{unknown[0]}'{whose}: unknown option ({keys})")
    for key, value in values.items():   # as the typed node would hold it: 2 -> 2.0
        if type(value) is int and type(known[key].default) is float:
            values[key] = float(value)
    try:
        made = options(**values)
    except (ValueError, TypeError) as exc:
        raise MezoError(f"config field {name!r}{whose}: {_first_line(exc)}") from None
    check_option_types(made, name)
    return made


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def choice_options(cls, section, name: str, kind: str = "schedule") -> Any:
    """The settings of the chosen schedule or estimator ``cls`` from the mapping ``name``
    (``mezo.lr_schedule_options``, ``mezo.eps_schedule_options``, ``mezo.estimator_options``:
    one schedule class may drive both lr and eps, so settings live beside the choice, not
    in a section of their own): an instance of ``cls.options``, checked by ``options_from``
    as every plugin's are, or None for a plugin that declares none (the mapping must then
    be empty). ``kind`` names the plugin kind in errors."""
    options = getattr(cls, "options", None)
    made = options_from(options or NO_OPTIONS, section, name, f"{kind} {cls.name!r}")
    return made if options else None


#: the options of a plugin that declares none: any key is unknown
NO_OPTIONS = make_dataclass("NoOptions", [])


def _line_of(text: str, key: str) -> str:
    """', line N' of ``key`` (a dotted path) in the YAML text, following its mappings."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return ""
    line = None
    for part in key.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if k.value == part:
                line, node = k.start_mark.line + 1, v
                break
        else:
            break
    return f", line {line}" if line else ""


def load_config(path: str | Path | None = None, overrides: List[str] = (), registry=None) -> DictConfig:
    """Schema defaults <- YAML file <- ``key=value`` overrides, validated.

    ``registry``: whose plugins' option sections the schema holds (default: the
    installed plugins)."""
    from .registry import or_installed
    registry = or_installed(registry)
    cfg = OmegaConf.structured(schema(registry))
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise MezoError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise MezoError(f"config file {path}: cannot read it: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise MezoError(f"config file {path}: not UTF-8 (byte {exc.start})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark else ""
            raise MezoError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
        if not isinstance(data, dict):
            raise MezoError(f"{path}: the top level must be a mapping of keys")
        for key in data:
            if key in MOVED:
                raise MezoError(f"{path}{_line_of(text, key)}: field {key!r} is now {MOVED[key]!r}")
        try:
            cfg = OmegaConf.merge(replaceable(cfg, data), OmegaConf.create(data))
        except OmegaConfBaseException as exc:
            key, msg = describe(exc)
            raise MezoError(f"{path}{_line_of(text, key)}: field {key!r}: {msg}") from None
    for item in overrides:
        cfg = apply_override(cfg, item)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        key, msg = describe(exc)
        raise MezoError(f"config field {key!r}: {msg}") from None
    validate(cfg)
    for key in dict.fromkeys(literal_escapes(cfg)):
        from .errors import warn
        warn(f"config field {key!r} holds a backslash and n or t as two characters, not a newline or "
             f"tab: in YAML write the string in double quotes (\"...\\n...\"), on the command line "
             f"\\\\n is a literal backslash-n")
    for name, kind in plugin_sections(registry).items():
        if is_dataclass(kind):  # the options' own checks (__post_init__), before any work
            options_from(kind, cfg.get(name), name)
    for which in ("lr", "eps"):  # a registered schedule's options, likewise (an unknown name: the trainer's error)
        chosen = registry.items["epsilon_schedules"].get(cfg.mezo[f"{which}_schedule"])
        if chosen is not None:
            choice_options(chosen.obj, cfg.mezo[f"{which}_schedule_options"], f"mezo.{which}_schedule_options")
    chosen = registry.items["estimators"].get(cfg.mezo.estimator)   # an estimator's options, likewise
    if chosen is not None:
        choice_options(chosen.obj, cfg.mezo.estimator_options, "mezo.estimator_options", "estimator")
    chosen = registry.items["rewards"].get(cfg.task.reward) if cfg.task.kind == "reward" else None
    if chosen is not None:   # a reward's options, likewise
        choice_options(chosen.obj, cfg.task.reward_options, "task.reward_options", "reward")
    return cfg


def _template_problem(template: str) -> str | None:
    """A template is a format string: anything but ``{text}`` could read object
    attributes (``{text.__class__}``) or fail at the first example."""
    try:
        fields = [(name, conv, spec) for _, name, spec, conv in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        return f"is not a valid template: {exc} (write a literal brace as {{{{ or }}}})"
    for name, conv, spec in fields:
        if (name, conv, spec) != ("text", None, ""):
            shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            return f"may hold only the placeholder {{text}}, not {shown}"
    return None if fields else "must contain {text}"


def validate(cfg: DictConfig) -> None:
    """Value checks that the types alone cannot express."""
    def need(ok, key, what):
        if not ok:
            got = repr(OmegaConf.select(cfg, key))
            raise MezoError(f"config field {key!r}: {what} (got {got if len(got) <= 80 else got[:60] + '...'})")
    m = cfg.mezo
    need(m.steps >= 0, "mezo.steps", "must be >= 0")
    need(m.batch_size > 0, "mezo.batch_size", "must be > 0")
    need(1 <= m.q <= MAX_Q, "mezo.q", f"must be in [1, {MAX_Q}] (directions per step, 2q forwards each)")
    # below ~1e-7 a perturbation of fp32 weights of size ~1 is lost to rounding: no signal at all
    need(math.isfinite(m.eps) and MIN_EPS <= m.eps <= 1, "mezo.eps", f"must be a number in [{MIN_EPS}, 1]")
    need(math.isfinite(m.lr) and m.lr >= 0, "mezo.lr", "must be a finite number >= 0")
    for key in ("eps_end", "lr_end"):
        value = m[key]
        need(value is None or (math.isfinite(value) and value >= 0), f"mezo.{key}", "must be a finite number >= 0 or null")
    need(m.warmup_steps >= 0, "mezo.warmup_steps", "must be >= 0")
    need(math.isfinite(m.weight_decay) and m.weight_decay >= 0, "mezo.weight_decay", "must be >= 0")
    need(m.lr * m.weight_decay < 1, "mezo.weight_decay",
         f"times mezo.lr ({m.lr}) must be < 1: each step scales the weights by 1 - lr * weight_decay")
    need(m.z in ("gaussian", "rademacher"), "mezo.z", "must be 'gaussian' or 'rademacher'")
    need(1 <= cfg.lora.r <= MAX_LORA_R, "lora.r", f"must be in [1, {MAX_LORA_R}]")
    need(math.isfinite(cfg.lora.alpha) and 0 < cfg.lora.alpha <= 1e6, "lora.alpha",
         "must be a finite number in (0, 1e6] (the adapter's scale is alpha / r)")
    need(cfg.lora.layers is None or (len(cfg.lora.layers) > 0 and min(cfg.lora.layers) >= 0), "lora.layers",
         "must list layer indices >= 0, or be null for every layer")
    need(len(cfg.lora.target_modules) > 0, "lora.target_modules", "must name at least one module")
    t = cfg.task
    need(t.k_per_class is None or t.k_per_class >= 1, "task.k_per_class",
         "must be >= 1, or null (then task.n_train rows, or every row)")
    need(t.n_train is None or t.n_train >= 1, "task.n_train", "must be >= 1 or null (every row)")
    need(t.n_dev is None or t.n_dev >= 1, "task.n_dev", "must be >= 1 or null (every row)")
    need(len(t.template) <= MAX_TEMPLATE, "task.template", f"must be at most {MAX_TEMPLATE} characters")
    need(cfg.task.kind in ("classification", "multiple_choice", "completion", "reward"), "task.kind",
         "must be 'classification', 'multiple_choice', 'completion' or 'reward'")
    need(t.max_new_tokens >= 1, "task.max_new_tokens", "must be >= 1")
    need(t.samples >= 1, "task.samples", "must be >= 1 (1: the greedy completion)")
    need(math.isfinite(t.temperature) and t.temperature > 0, "task.temperature", "must be > 0")
    verbalizer = cfg.task.verbalizer
    mapping = isinstance(verbalizer, DictConfig)
    need(mapping or isinstance(verbalizer, ListConfig), "task.verbalizer",
         "must be a list of words or a mapping {label name: word}")
    words = list(verbalizer.values()) if mapping else list(verbalizer)
    need(all(isinstance(w, str) for w in words), "task.verbalizer", "must hold words (strings)")
    need(cfg.task.max_tokens is None or cfg.task.max_tokens > 0, "task.max_tokens", "must be > 0 or null")
    need(cfg.threads is None or 0 < cfg.threads <= MAX_THREADS, "threads", f"must be in [1, {MAX_THREADS}] or null")
    need(len(set(cfg.report_to)) == len(cfg.report_to), "report_to", "names a logger twice")
    if cfg.task.kind == "classification":
        need(len(words) >= 2, "task.verbalizer", "needs a word for each of >= 2 labels")
        need(cfg.task.train_loss in ("choices", "target"), "task.train_loss", "must be 'choices' or 'target'")
        problem = _template_problem(cfg.task.template)
        need(problem is None, "task.template", problem)
        need(all(words), "task.verbalizer", "holds an empty word")
        need(len(set(words)) == len(words), "task.verbalizer", "holds a word twice")
    if cfg.task.kind == "multiple_choice":
        need(cfg.task.train_loss in ("choices", "target"), "task.train_loss", "must be 'choices' or 'target'")
        problem = _template_problem(cfg.task.template)
        need(problem is None, "task.template", problem)
    if cfg.task.hf_dataset is not None:
        from .readers import hf_dataset_spec
        hf_dataset_spec(cfg.task.hf_dataset)  # the shape only; the data is read when the task is
    need(cfg.eval_batch_size > 0, "eval_batch_size", "must be > 0")
    need(cfg.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
    need(cfg.eval_every >= 0, "eval_every", "must be >= 0 (0: only zero-shot and final)")
    need(cfg.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
    need(cfg.selection.early_stop_patience >= 0, "selection.early_stop_patience", "must be >= 0")
    need(0 <= cfg.selection.significance < 1, "selection.significance", "must be in [0, 1)")
    need(cfg.selection.correction in BEST_CORRECTIONS, "selection.correction",
         f"must be one of {', '.join(map(repr, BEST_CORRECTIONS))}")
    need(cfg.task.n_val >= 0, "task.n_val", "must be >= 0")
    need(cfg.task.val_overlap_words >= 0, "task.val_overlap_words", "must be >= 0 (0: no check)")
    g = cfg.guard
    need(g.window >= 1, "guard.window", "must be >= 1")
    need(g.patience >= 1, "guard.patience", "must be >= 1")
    need(0 < g.cut <= 1, "guard.cut", "must be in (0, 1]")
    need(0 < g.nonfinite_cut <= 1, "guard.nonfinite_cut", "must be in (0, 1]")
    need(g.rise >= 0 and g.rise_abs >= 0, "guard.rise", "must be >= 0")
    need(g.clip >= 0, "guard.clip", "must be >= 0")
    need(g.max_recoveries >= 0, "guard.max_recoveries", "must be >= 0")
    need(cfg.mezo.weight_decay >= 0, "mezo.weight_decay", "must be >= 0")
    need(cfg.mezo.ema_half_life >= 0, "mezo.ema_half_life", "must be >= 0 (steps; 0: off)")
    need(cfg.model.quantization in QUANTIZATIONS, "model.quantization",
         f"must be one of {', '.join(str(q) for q in QUANTIZATIONS[1:])}, or null")
    need(re.fullmatch(r"cpu|mps|cuda(:\d+)?", cfg.model.device) is not None, "model.device",
         "must be cpu, cuda, cuda:N or mps")
