"""Who gets which identity: registration entries, join tokens and joined agents in the configured store, node
attestation with projected service account tokens, and entries kept in step with pods by IdentityTemplates.
"""
