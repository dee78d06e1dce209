"""The merge: methods (a registry), the plan of a merge, streaming it to disk or into a live model, the model card."""
