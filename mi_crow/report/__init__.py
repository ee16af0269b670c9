"""The browsable feature report: one self-contained HTML file per SAE (see :func:`write_feature_report`)."""

from mi_crow.report.html import write_feature_report
from mi_crow.report.stats import FeatureStats, compute_feature_stats, feature_stats_from_store
from mi_crow.report.svg import histogram_chart, line_chart

__all__ = [
    "FeatureStats",
    "compute_feature_stats",
    "feature_stats_from_store",
    "histogram_chart",
    "line_chart",
    "write_feature_report",
]
