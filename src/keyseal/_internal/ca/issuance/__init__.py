"""What the CA signs: X.509-SVID leaves (assembled from DER parts), JWT-SVIDs, and the audit of each signature."""
