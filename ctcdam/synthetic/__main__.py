"""``python -m ctcdam.synthetic``: generate the embedded default data set and print its LIDC root."""
from ctcdam.synthetic.default import ensure_default_dicom

if __name__ == "__main__":
    print(ensure_default_dicom())
