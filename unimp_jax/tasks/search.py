"""Product search: the item a query asks for, given the history (ranked like recommendation)."""

from __future__ import annotations

from unimp_jax.tasks import recommendation


class Search(recommendation.NextItem):
  name = 'search'
  instruction = 'Query: {query} What is the related item ID to the query based on the history?'


TASK = Search()
