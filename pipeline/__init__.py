"""Touchpoint pipeline: customer touchpoints in, live CX and UX indicators and alerts out.

The flow, one folder a step: ``contract`` (wire format and schemas) -> ``core`` (decode, validate,
enrich, aggregate, evaluate; pure Python) -> ``adapters`` (Kafka, Faust, ClickHouse, Prometheus).
"""

__version__ = "0.1.0"
