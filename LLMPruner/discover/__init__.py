"""Discovery: trace a model once and find the groups of coupled parameter slices.

``trace.py`` records every torch call of one forward pass and propagates *channel ids* through it
(``rules.py``); ``ids.py`` joins ids that must be removed together; ``groups.py`` turns the joined ids
into groups of ``(parameter, dim, indices)``. No module name appears here: the adapter only names what a
group is (attention / mlp / hidden) and where the decoder layers are.
"""
from LLMPruner.discover.groups import Family, Member, discover

__all__ = ["Family", "Member", "discover"]
