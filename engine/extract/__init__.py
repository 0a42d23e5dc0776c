"""Raw video -> the standard feature layout (``python -m engine.extract``; see :mod:`.pipeline`, :mod:`.layout`).

Submodules: ``decode`` (PyAV frames at a target rate), ``clip`` (CLIP image/text features), ``slowfast``
(SlowFast 8x8 R50), ``layout`` (files, keys, contract check), ``pipeline`` (one video, corpus, queries),
``cache`` (per-file feature cache for ``engine.predict --video``). Heavy imports (PyAV, transformers) happen
only when an extractor is built or a video decoded.
"""

from .decode import VideoError, probe
from .layout import extractors_for
from .pipeline import Extractors, extract_corpus, extract_queries, extract_video, list_videos

__all__ = ["VideoError", "probe", "extractors_for", "Extractors", "extract_corpus", "extract_queries",
           "extract_video", "list_videos"]
