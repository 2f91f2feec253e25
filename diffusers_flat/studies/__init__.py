"""Studies: the study file, the study directory, the claims and the study and generalization reports."""
