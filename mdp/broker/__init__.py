"""The MDP broker: a sans-IO core (`core`) and the pyzmq loop that drives it (`server`)."""

from mdp.broker.core import BrokerConfig, BrokerCore, BrokerStats
from mdp.broker.server import BrokerServer

__all__ = ["BrokerConfig", "BrokerCore", "BrokerServer", "BrokerStats"]
