"""Who may do what: credentials (JWT, API keys, Basic), roles, study-scoped launch tokens,
and the audit trail. Framework-free: the DICOMweb service and the receiver translate."""
