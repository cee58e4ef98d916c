"""Step S1 of the paper: log the agent's calls into the workspace store.

Three ways in, one record form (``slmigrate.record.CallRecord``):
- ``importer``: ``collect import`` of existing logs, each file's shape recognised by ``formats``;
- ``proxy``: ``collect proxy``, an OpenAI-compatible HTTP server that forwards to the upstream LLM and logs;
- ``capture``: ``capture.instrument(client)``, the same logging inside the agent's Python process.
The two live paths hand calls to one background ``writer`` (batched, bisects a refused batch, sends what the
store will not take to ``deadletter``); ``streaming`` rebuilds a streamed answer.
"""

from slmigrate.collect.importer import expand_paths, import_calls, load_tools

__all__ = ["expand_paths", "import_calls", "load_tools"]
