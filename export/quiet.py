"""`export -q`: transformers says nothing while it loads and runs the source model.

transformers talks on stderr three ways: its logger (warnings such as the Llama tokenizer's
"legacy behaviour" notice), its own tqdm bars (the GGUF tokenizer's merges), which both have a
switch, and plain tqdm bars that no switch reaches (the GGUF tensor conversion), which only a
redirected sys.stderr silences. All three are set for the duration of the export only and restored
after, so a program that imports edgesparse.export keeps its own settings; errors still surface as
exceptions (and transformers' error-level log lines still print).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def hushed(quiet: bool) -> Iterator[None]:
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging
    # Asking for the verbosity also attaches transformers' log handler to the real stderr now, not
    # to the redirected one below (it keeps the stream it was made with).
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
