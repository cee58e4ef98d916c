"""Step S2 of the paper: turn the stored calls into a dataset that is safe to fine-tune on.

``run.curate`` filters, de-duplicates, scrubs (``pii``) and splits; ``run.curate_calls`` filters, de-duplicates
and scrubs a given batch of calls the same way (refine's new traffic) without writing anything; ``dataset`` owns
the curated versions it writes (``curated/vNNNN/``) and is how every later stage reads them.
"""

from slmigrate.curate.run import CurateResult, curate, curate_calls, drop_reason, export

__all__ = ["CurateResult", "curate", "curate_calls", "drop_reason", "export"]
