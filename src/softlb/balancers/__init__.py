"""Balancing strategies, one module per family, all behind :class:`Balancer`.

=========================  ===========================  ==================================
config name                class                        family
=========================  ===========================  ==================================
``round_robin``            :class:`RoundRobin`          rotation
``weighted_round_robin``   :class:`WeightedRoundRobin`  rotation (nginx smooth / Envoy EDF)
``least_connections``      :class:`LeastConnections`    load
``random``                 :class:`Random`              random (weighted)
``power_of_two_choices``   :class:`PowerOfTwoChoices`   random + load
``consistent_hash``        :class:`ConsistentHash`      hashing (ring, virtual nodes)
``peak_ewma``              :class:`PeakEwma`            random + latency
=========================  ===========================  ==================================
"""

from softlb.balancers.base import BALANCERS, Balancer, balancer_by_name, register
from softlb.balancers.ewma import PeakEwma
from softlb.balancers.hashing import ConsistentHash, parse_hash_key
from softlb.balancers.least import LeastConnections
from softlb.balancers.randomized import PowerOfTwoChoices, Random
from softlb.balancers.rotation import RoundRobin, WeightedRoundRobin

__all__ = [
    "BALANCERS",
    "Balancer",
    "ConsistentHash",
    "LeastConnections",
    "PeakEwma",
    "PowerOfTwoChoices",
    "Random",
    "RoundRobin",
    "WeightedRoundRobin",
    "balancer_by_name",
    "parse_hash_key",
    "register",
]
