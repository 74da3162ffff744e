"""The dashboard's shared code: cached reads of the results store (``data``), aggregation over
seeds (``stats``), charts (``charts``) and page pieces (``ui``). Reads go through
``workbench.results`` only; nothing here imports training code."""
