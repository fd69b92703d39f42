"""ctcdam.export: explained scans -> 3D Slicer review bundles.

An explained scan arrives as a ``result.ScanResult`` (made by ``ctcdam.workflows.explain_scan``);
``bundle.write_bundle`` writes ``OUT/<scan_id>/`` atomically: CT and maps as NIfTI (``volumes``), the nodule
segmentation (``segmentation``), centroid fiducials (``markups``), the diverging colour table (``colors``),
the scene and its ``.mrb`` (``scene``), ``review.py`` (``review_script``), ``report.png`` (``report``) and
``predictions.json``. Export imports only ``ctcdam.io``, ``ctcdam.targets`` and ``ctcdam.data.views`` from the
package. Nothing here is imported eagerly, so the CLI can check its arguments before torch is loaded.
"""
