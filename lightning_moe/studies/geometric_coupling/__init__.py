"""Router–expert geometric coupling and the K-Means router: the report section. Recipes: ``recipes/geometric_coupling/``."""
