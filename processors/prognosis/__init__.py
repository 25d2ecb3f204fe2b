"""Recurrence prognosis: trial data, CatBoost model with SHAP, FHIR mapping and the stream processor.

Entry points: ``fhir_mapping.features_from_bundle`` reads a FHIR R4 Bundle,
``model.RecurrenceModel.load`` and ``RecurrenceModel.predict`` score it, and
``train`` rebuilds the shipped weights in ``weights/``.
"""
