"""ctcdam.export: explained scans -> 3D Slicer review bundles (DESIGN.md §7).

``scan.explain_scan`` loads a scan, crops its nodules as training did, predicts and computes the CDAM maps;
``bundle.write_bundle`` writes ``OUT/<scan_id>/`` atomically: CT and maps as NIfTI (``volumes``), the nodule
segmentation (``segmentation``), centroid fiducials (``markups``), the diverging colour table (``colors``),
the scene and its ``.mrb`` (``scene``), ``review.py`` (``review_script``), ``report.png`` (``report``) and
``predictions.json``. ``run.run_explain`` is what ``pipelines/explain.py`` calls. Nothing here is imported
eagerly, so the CLI can check its arguments before torch is loaded.
"""
