"""Training pieces used by the compression steps: data, Lightning modules, losses."""
