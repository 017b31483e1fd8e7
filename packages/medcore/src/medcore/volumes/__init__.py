"""CT volumes: DICOM and NIfTI readers, the canonical geometry, the HDF5 volume store."""
