"""MoE design by total parameters and sparsity: the report section. Recipes: ``recipes/sparsity/``."""
