"""Agent Cards (A2A v1.0, section 8): one per available agent, built from its retained status
and the gateway's URL, and the gateway's own, which lists them."""

from __future__ import annotations

from typing import Optional

from .. import __version__
from . import a2a

_BEARER = "bearer"
POOL_EXTENSION = "urn:agent2389:pool"  # an agent served by a pool: how many members it has now


def _interface(url: str) -> dict:
    return {"url": url, "protocolBinding": a2a.JSONRPC, "protocolVersion": a2a.PROTOCOL_VERSION}


def _security(auth: bool) -> dict:
    if not auth:
        return {}
    return {"securitySchemes": {_BEARER: {"httpAuthSecurityScheme": {
                "scheme": "Bearer", "description": "a token of the gateway's --auth-token-file"}}},
            "securityRequirements": [{"schemes": {_BEARER: {"list": []}}}]}


def agent_url(base_url: str, agent_id: str) -> str:
    return f"{base_url}/agents/{agent_id}"


def agent_card(agent_id: str, status: dict, base_url: str, auth: bool) -> dict:
    description = str(status.get("description") or f"agent2389 agent {agent_id}")
    capabilities = [c for c in status.get("capabilities") or [] if isinstance(c, str)]
    skills = [{"id": capability, "name": capability, "description": f"{description} ({capability})",
               "tags": [capability]} for capability in capabilities] or \
        [{"id": agent_id, "name": agent_id, "description": description, "tags": ["agent2389"]}]
    card_capabilities: dict = {"streaming": True, "pushNotifications": False}
    members: Optional[object] = status.get("instances_hint")
    if isinstance(members, int) and members > 0:
        card_capabilities["extensions"] = [{"uri": POOL_EXTENSION, "description": f"a pool of {members} members",
                                            "required": False, "params": {"members": members}}]
    return {"name": agent_id, "description": description, "supportedInterfaces": [
                _interface(agent_url(base_url, agent_id))],
            "provider": {"organization": "agent2389", "url": base_url},
            "version": str(status.get("version") or __version__), "capabilities": card_capabilities,
            "defaultInputModes": ["text/plain", "application/json"], "defaultOutputModes": ["text/plain"],
            "skills": skills, **_security(auth)}


def gateway_card(agents: dict[str, dict], base_url: str, auth: bool) -> dict:
    """The gateway itself: its skills are the agents (a message to its own URL names one in
    `metadata.agent_id`), and `agents` (an extension field clients ignore) links their cards."""
    skills = [{"id": agent_id, "name": agent_id,
               "description": str(status.get("description") or f"agent2389 agent {agent_id}"),
               "tags": [c for c in status.get("capabilities") or [] if isinstance(c, str)] or ["agent2389"]}
              for agent_id, status in sorted(agents.items())]
    return {"name": "agent2389 gateway", "description": f"A2A gateway to {len(agents)} agent2389 agents over MQTT",
            "supportedInterfaces": [_interface(f"{base_url}/")],
            "provider": {"organization": "agent2389", "url": base_url}, "version": __version__,
            "capabilities": {"streaming": True, "pushNotifications": False},
            "defaultInputModes": ["text/plain", "application/json"], "defaultOutputModes": ["text/plain"],
            "skills": skills, **_security(auth),
            "agents": [{"agent_id": agent_id, "card": f"{agent_url(base_url, agent_id)}/.well-known/agent-card.json"}
                       for agent_id in sorted(agents)]}
