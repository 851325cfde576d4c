"""dcml: Divide and Conquer the Embedding Space for Metric Learning (Sanakoyeu et al.).

The pure method: torch, numpy, faiss, scikit-learn, scipy, pyarrow. Never imports
prefect, mlflow or dvc.
"""

__version__ = "0.1.0"
