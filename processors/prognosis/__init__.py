"""Recurrence prognosis: trial data, CatBoost models with SHAP, FHIR mapping, what-if and the stream processor.

Entry points:

- ``fhir_mapping.features_from_bundle`` reads a FHIR R4 Bundle into model features.
- ``survival_model.RecurrenceSurvivalModel`` (CatBoost Cox, weights
  ``weights/recurrence_survival_catboost.cbm``) predicts recurrence within 3
  and 5 years with SHAP contributions and a decision path.
- ``train_survival`` rebuilds those weights, and ``evaluate`` compares the
  model with a Cox PH baseline.
- ``whatif.simulate``, the HTTP API in ``api`` and ``python -m processors.prognosis.whatif``
  answer what-if questions; ``benchmark`` times them.
- ``model.RecurrenceModel`` is the earlier 5-year classifier (weights
  ``weights/recurrence_catboost.cbm``, rebuilt by ``train``) that the stream
  processor loads until it moves to the survival model.
"""
