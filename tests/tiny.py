"""The test helpers live in ``mezo_core.testing`` (importable by plugin packages
and benchmarks); this name stays for the tests that import ``tiny``."""
from mezo_core.testing import (WORDS, InterruptAt, build_model, corpus, train_tokenizer,  # noqa: F401
                               write_run_config, write_task_files)
