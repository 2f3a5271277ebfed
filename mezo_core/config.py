"""Run configuration: a typed OmegaConf schema, YAML files from ``conf/`` and
``key=value`` overrides. Every mistake becomes a MezoError naming the file,
line or field."""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, StringNode
from omegaconf.errors import OmegaConfBaseException

from .errors import MezoError

DEFAULT_RECIPE = "sst2"
DEFAULT_CONFIG = f"conf/{DEFAULT_RECIPE}.yaml"  # in the working directory, else the packaged recipe
#: ranges beyond which a value is a mistake, not a setting (issue #31: each was a traceback or silent)
MAX_Q, MIN_EPS, MAX_LORA_R, MAX_TEMPLATE, MAX_THREADS = 4096, 1e-7, 65536, 10_000, 1024
#: model.quantization's values (the hf backend: torchao; the engines: their fp8)
QUANTIZATIONS = (None, "int8", "fp8", "fp8w")
#: selection.correction's values (mezo_core.selection.best_level applies them)
BEST_CORRECTIONS = ("bonferroni", "none")


def recipes_dir() -> Path:
    """The recipes shipped with mezo-run: ``mezo_core.recipes`` in a wheel or an
    editable install (mapped to conf/), else the checkout's conf/ (an editable
    install made before the recipes were packaged)."""
    from importlib.resources import files
    try:
        return Path(str(files("mezo_core.recipes")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "conf"


def recipes() -> dict[str, Path]:
    """Recipe name -> its YAML file."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"), key=lambda p: p.stem)}


def default_config() -> Path:
    """conf/sst2.yaml of the working directory when there is one (a checkout, or a
    copy made by ``mezo-run init``), else the packaged recipe: train runs anywhere."""
    here = Path(DEFAULT_CONFIG)
    return here if here.exists() else recipes_dir() / f"{DEFAULT_RECIPE}.yaml"


@dataclass
class ModelConfig:
    # a Hugging Face model folder or a .gguf file (converted once into ~/.cache/mezo-run)
    path: str = "${assets}/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    dtype: str = "float32"                 # float32 | bfloat16 | float16
    device: str = "cpu"                    # cpu | cuda | cuda:N | mps
    # frozen base weights in 8 bits (the adapter and MeZO unchanged): int8 (weight-only), fp8 (fp8 weights
    # and activations: FP8 matmuls, GPUs of compute capability >= 8.9), fp8w (fp8 weight-only); null: off
    quantization: Optional[str] = None


@dataclass
class LoraConfig:
    r: int = 8                             # LoRA rank
    alpha: float = 16.0                    # LoRA scaling numerator (scale = alpha / r)
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # module names to adapt
    layers: Optional[List[int]] = None     # None: every layer


@dataclass
class TaskConfig:
    # classification (verbalizer words) | multiple_choice (each row's own "choices") | completion
    kind: str = "classification"
    train: str = "${assets}/data/sst2/train.tsv"  # .tsv (sentence, label) or .jsonl
    dev: str = "${assets}/data/sst2/dev.tsv"      # the reported evaluation set
    # a Hugging Face dataset instead of the files: "PATH" or "PATH:NAME" (glue:sst2), or a mapping
    # {path, name, split_train, split_dev, split_val, text_field, label_field, ...} (needs `datasets`)
    hf_dataset: Any = None
    template: str = "{text} It was"        # classification/multiple-choice prompt; {text} is the input
    # word of label i, or {label name: word} (the data's labels may then be the names)
    verbalizer: Any = field(default_factory=lambda: [" terrible", " great"])
    k_per_class: Optional[int] = 16        # MeZO-paper sampling: k train examples per class ...
    n_train: Optional[int] = None          # ... or n examples (when k_per_class is null)
    n_dev: Optional[int] = None            # a seeded random sample of n dev examples (null: all)
    # validation examples drawn from the train file, disjoint from the training sample: what
    # periodic evaluations select the best adapter and early-stop on (0: select on dev)
    n_val: int = 0
    # a validation file of its own (e.g. held-out data distributed like dev) instead of the
    # train file; n_val then samples it (0: all of it)
    val: Optional[str] = None
    # a train row and a validation row where one is a run of >= this many words of the other
    # are not both used: the train row is left out (treebank phrases such as SST-2's would
    # otherwise train on pieces of the validation sentences); 0: no check
    val_overlap_words: int = 4
    sample_seed: int = 42                  # seed of the train/dev/validation sampling
    # classification/multiple-choice loss: "choices" = cross-entropy among the candidates (the
    # verbalizer's words or the row's choices, each scored by its mean token loss: MeZO's
    # train_as_classification); "target" = LM loss of the gold candidate
    train_loss: str = "choices"
    # longest sequence (prompt + answer) in tokens: longer texts are cut, never the template's
    # answer slot (null: no limit)
    max_tokens: Optional[int] = None
    group_by_length: bool = False          # training batches of rows of similar length (less padding)
    # completion tasks: also score greedy generations against the gold completion (exact_match)
    exact_match: bool = True


@dataclass
class MezoConfig:
    steps: int = 200                       # optimisation steps (2 q forward passes each)
    batch_size: int = 16                   # examples per step
    q: int = 1                             # directions per step
    lr: float = 1e-4                       # step size (the peak, for shaped schedules)
    lr_schedule: str = "constant"          # a schedule plugin: constant, linear, cosine, exponential, spall, fzoo, rms
    lr_end: Optional[float] = None         # final lr of linear/cosine/exponential (null: lr)
    warmup_steps: int = 0                  # linear lr warm-up from 0
    eps: float = 1e-3                      # perturbation size
    eps_schedule: str = "constant"         # a schedule plugin: constant, ..., spall_eps, noise_floor
    eps_end: Optional[float] = None        # final eps of shaped schedules (null: eps)
    weight_decay: float = 0.0              # decoupled decay, theta <- (1 - lr*wd) theta
    # tensors whose name contains one of these are not decayed (MeZO's reference spares
    # biases and layer norms; matters with hf.full_params)
    weight_decay_exempt: List[str] = field(default_factory=lambda: ["bias", "norm"])
    # fold restore + update + the next step's +eps*z into one pass over the weights
    # (2 passes per step instead of 3), except before an evaluation or checkpoint
    fuse_steps: bool = True
    z: str = "gaussian"                    # distribution of z: gaussian (MeZO) or rademacher (+-1, SPSA)
    # evaluate, select and save an exponential moving average of the weights, half of it from the
    # last ema_half_life steps (mezo_core/average.py: SPSA iterate averaging); 0: the raw weights
    ema_half_life: int = 0
    lr_schedule_options: Dict[str, Any] = field(default_factory=dict)   # the schedule's own settings
    eps_schedule_options: Dict[str, Any] = field(default_factory=dict)   # the eps schedule's settings


@dataclass
class GuardConfig:
    """The convergence guard (mezo_core/guard.py): roll back and cut the step size
    when losses go non-finite or the smoothed training loss keeps rising."""
    enabled: bool = True                   # off: a run may collapse or go NaN unnoticed
    window: int = 50                       # EMA span of the training loss and of g^2
    warmup: int = 20                       # steps before the guard judges
    rise: float = 0.2                      # tolerated rise of the smoothed loss over its best (relative) ...
    rise_abs: float = 0.05                 # ... plus this much (absolute)
    patience: int = 50                     # steps above that before a roll-back
    cut: float = 0.5                       # step-size factor after a roll-back for a rise
    nonfinite_cut: float = 0.1             # ... after a non-finite step
    clip: float = 10.0                     # clip |g| to clip x its running RMS (0: off)
    max_recoveries: int = 8                # roll-backs before the run stops (exit 3)


@dataclass
class SelectionConfig:
    """Which evaluated adapter best/ keeps and the run hands over (mezo_core/selection.py);
    evaluations come every ``eval_every`` steps."""
    significance: float = 0.05             # best/ changes only for an adapter right on significantly more examples
                                           # (one-sided paired sign test; the level of the whole run, see
                                           # correction; 0: any gain)
    correction: str = "bonferroni"         # bonferroni: the first move off the first adapter is tested at
                                           # significance / ceil(mezo.steps / eval_every), so noise alone moves
                                           # best/ with probability <= significance over the run; later moves at
                                           # significance; none: every test at significance (noise passes far
                                           # more often)
    load_best_at_end: bool = True          # with eval_every: adapter/, the run's result, is best/ (selected on
                                           # task.n_val's validation set, or dev without one); false: the last
                                           # adapter. last/ (the trained weights) and best/ are always kept
    early_stop_patience: int = 0           # stop after this many evaluations without a new best (0: never)


#: fields that moved into a section: an old key is an error naming the new one
MOVED = {"best_significance": "selection.significance", "best_correction": "selection.correction",
         "load_best_at_end": "selection.load_best_at_end", "early_stop_patience": "selection.early_stop_patience"}


@dataclass
class RunConfig:
    backend: str = "hf"                    # a backend plugin: hf, vllm, sglang, ... (mezo-run backends)
    seed: int = 0                          # the batches and z directions are functions of (seed, step)
    assets: str = "${oc.env:MEZO_ASSETS,../shared/assets}"  # folder with models/ and data/
    out_dir: str = "runs/sst2"             # the run folder (locked while a run uses it)
    eval_every: int = 0                    # 0: only zero-shot and final
    eval_batch_size: int = 32              # rows per evaluation forward
    checkpoint_every: int = 50             # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2              # newest checkpoints kept
    zero_shot: bool = True                 # evaluate before the first step
    plot: bool = True                      # write training.png at the end
    progress: bool = True                  # progress bars
    report_to: List[str] = field(default_factory=lambda: ["jsonl"])  # loggers: jsonl, csv, tensorboard, ...
    threads: Optional[int] = None          # torch intra-op threads (null: OMP_NUM_THREADS, else the usable cores)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    mezo: MezoConfig = field(default_factory=MezoConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    # + one section per plugin with options (hf, vllm, ...): plugin_sections()


def plugin_sections(registry) -> Dict[str, Any]:
    """Section name -> the options dataclass of the plugin of that name, or
    ``Dict[str, Any]`` for a backend without one (free-form: the backend checks its
    keys; none where its name is not an identifier). Plugins own their settings;
    the core only merges them in, by name."""
    core = {f.name for f in fields(RunConfig)}
    sections: Dict[str, Any] = {}
    owners: Dict[str, str] = {}
    for kind, items in registry.items.items():
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


def options_from(options: type, section, name: str) -> Any:
    """An ``options`` dataclass from its config section ``name``: None (the defaults),
    an instance, a typed node (``load_config``'s) or a plain mapping (tests,
    notebooks). Unknown keys and the dataclass's own checks are one-line errors
    naming ``name.key``."""
    if section is None:
        return options()
    if isinstance(section, options):
        return section
    if OmegaConf.is_config(section) and OmegaConf.get_type(section) is options:
        try:
            return OmegaConf.to_object(section)
        except (ValueError, TypeError, OmegaConfBaseException) as exc:  # the dataclass's own checks
            raise MezoError(f"config field {name!r}: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    values = dict(OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else section)
    known = [f.name for f in fields(options)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise MezoError(f"config field '{name}.{unknown[0]}': unknown option (its keys: {', '.join(known)})")
    try:
        return options(**values)
    except (ValueError, TypeError) as exc:
        raise MezoError(f"config field {name!r}: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None


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


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    kind = getattr(exc, "object_type", None)
    if "." not in key and msg.endswith("not in 'RunConfig'"):
        msg += " (neither a core field nor the section of an installed plugin: see mezo-run backends)"
    elif msg.startswith("Key '") and "not in" in msg and is_dataclass(kind):
        msg += f" (its keys: {', '.join(f.name for f in fields(kind))})"
    return key, msg


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
            cfg = OmegaConf.merge(_replaceable(cfg, data), OmegaConf.create(data))
        except OmegaConfBaseException as exc:
            key, msg = _describe(exc)
            raise MezoError(f"{path}{_line_of(text, key)}: field {key!r}: {msg}") from None
    for item in overrides:
        cfg = _apply_override(cfg, item)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        key, msg = _describe(exc)
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
    return cfg


def _apply_override(cfg: DictConfig, item: str) -> DictConfig:
    """``key=value`` split at the first '='. The value of a string field is taken
    as written (``task.template={text} It was`` is not YAML); other values are
    YAML, as in OmegaConf's dotlist."""
    key, eq, raw = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise MezoError(f"override {item!r}: expected key=value")
    if not re.fullmatch(r"\w+(\.\w+)*", key):
        raise MezoError(f"override {item!r}: {key!r} is not a dotted field name like mezo.lr")
    if key in MOVED:
        raise MezoError(f"override {item!r}: field {key!r} is now {MOVED[key]!r}")
    node = _schema_node(cfg, key)
    try:
        if isinstance(node, StringNode):
            patch = OmegaConf.create()
            OmegaConf.update(patch, key, None if raw == "null" and node._is_optional() else _unquote(raw))
        else:
            patch = OmegaConf.from_dotlist([f"{key}={raw}"])
        return OmegaConf.merge(_replaceable(cfg, patch), patch)
    except yaml.YAMLError as exc:
        raise MezoError(f"override {item!r}: field {key!r}: cannot parse {raw!r}: "
                        f"{getattr(exc, 'problem', None) or 'invalid YAML'}") from None
    except OmegaConfBaseException as exc:
        found, msg = _describe(exc)
        raise MezoError(f"override {item!r}: field {found or key!r}: {msg}") from None
    except (TypeError, ValueError) as exc:  # OmegaConf's own, for shapes it cannot merge
        raise MezoError(f"override {item!r}: field {key!r}: {exc}") from None


#: fields that may be a list or a mapping: a new value replaces the old one, never merges into it
REPLACED = ("task.verbalizer", "task.hf_dataset")


def _replaceable(cfg: DictConfig, incoming) -> DictConfig:
    """``cfg`` with the REPLACED fields that ``incoming`` sets emptied, so that a
    mapping can replace a list (OmegaConf cannot merge one into the other)."""
    for key in REPLACED:
        node = incoming
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is not None:
            cfg = cfg.copy()
            OmegaConf.update(cfg, key, None, merge=False)
    return cfg


def _schema_node(cfg: DictConfig, key: str):
    """The node at dotted ``key``, or None where the schema has none (the free-form backend sections)."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    return node


#: the escapes a string value on the command line understands, as in a double-quoted YAML string
ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def _unquote(raw: str) -> str:
    """``'a b'`` or ``"a b"`` -> ``a b`` (quoted strings were YAML before); anything else
    as written, except the escapes ``\\n``, ``\\t`` and ``\\\\``: a newline, a tab and a
    backslash, so that ``'task.template=Review: {text}\\nSentiment:'`` on the command
    line is the template a recipe writes as ``"Review: {text}\\nSentiment:"`` (other
    backslashes stay as written)."""
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
        if isinstance(value, str):
            return value
    return re.sub(r"\\([nt\\])", lambda m: ESCAPES[m.group(1)], raw)


def literal_escapes(cfg) -> list[str]:
    """Text fields holding a backslash followed by n or t as two characters: almost always
    a newline or tab meant in a YAML string written without double quotes."""
    words = cfg.task.verbalizer
    words = list(words.values()) if isinstance(words, DictConfig) else list(words or [])
    found = [("task.template", cfg.task.template)] + [("task.verbalizer", w) for w in words]
    return [key for key, text in found if isinstance(text, str) and re.search(r"\\[nt]", text)]


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
    need(cfg.task.kind in ("classification", "multiple_choice", "completion"), "task.kind",
         "must be 'classification', 'multiple_choice' or 'completion'")
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
        from .data import hf_dataset_spec
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
