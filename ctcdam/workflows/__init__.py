"""The cross-layer wiring that pipelines/*.py call: the synthetic default, preprocessing, training, explaining a scan.

``defaults``: ctcdam's cache folder and the synthetic default (DICOM root, its one preprocessed copy);
``preprocess``: a preprocessing run on a LIDC root or on the default; ``train``: the training runner;
``sources``: the newest checkpoint, the data a checkpoint came from, a scan in a DICOM root (no torch import,
for fast argument checks); ``explain_run`` (what pipelines/explain.py calls for one scan), ``explain_prepare``
(a scan's nodules and crops, no model), ``explain_scan`` (their predictions and maps) and ``concept`` (concept
queries over a checkpoint's training nodules); ``explain_cohort`` (many scans: sharded, resumable, the index),
``explain_workers`` (its loading and writing processes), ``worklist`` (the reader's ratings, also the cohort's
``review_cohort.py``) and ``explain_benchmark`` (cohort against a loop of single scans).
"""
