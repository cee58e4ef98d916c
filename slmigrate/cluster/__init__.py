"""Step S3 of the paper: discover the agent's recurring tasks by clustering its curated calls.

``cluster(ws, config)`` reads the curated dataset, embeds a task view of every call (``views``, ``features``),
clusters the distinct views (``fit``), describes each cluster (``stats``) and saves clusters/clusters.json, the
model used by ``assign`` (``model``), a 2-D map and each call's cluster in the store; it returns a
``ClusterResult``. docs/cluster.md has the method, the clusters.json schema and the measured quality figures.
"""

from slmigrate.artifacts import clusters_file as load_clusters  # the one reader of clusters.json
from slmigrate.cluster.model import ClusterModel
from slmigrate.cluster.run import ClusterResult, cluster, cluster_calls
from slmigrate.cluster.views import next_action, output_kind, task_view

__all__ = ["ClusterModel", "ClusterResult", "cluster", "cluster_calls", "load_clusters", "next_action", "output_kind",
           "task_view"]
