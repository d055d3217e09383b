"""Domain classifier service: which domain (radiology, ophthalmology, pathology) an image belongs to."""
