// Key Vault, authorised by Azure RBAC (no access policies). It holds the upstream keys the app
// stores through the management API, the encryption key, the operator key and, with sign-in on,
// the client secret.
param name string
param location string = resourceGroup().location
param tags object = {}
param encryptionKeySecretName string

@secure()
param encryptionKey string

param operatorKeySecretName string

@secure()
@description('The operator key (header x-aiproxy-operator-key).')
param operatorKey string

param authClientSecretName string

@secure()
@description('Client secret for sign-in; empty: none is stored.')
param authClientSecret string = ''

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    // Deleted secrets (upstream keys, the encryption key) stay recoverable for 90 days.
    softDeleteRetentionInDays: 90
    publicNetworkAccess: 'Enabled'
  }
}

resource encryptionKeySecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: encryptionKeySecretName
  properties: {
    value: encryptionKey
    contentType: 'Fernet key (url-safe base64 of 32 bytes)'
  }
}

// Overwritten at every provision with the azd environment's value: a new value there (the
// preprovision hook makes one when it is emptied) rotates the operator key.
resource operatorKeySecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: operatorKeySecretName
  properties: {
    value: operatorKey
    contentType: 'AI Proxy operator key (header x-aiproxy-operator-key)'
  }
}

resource authSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(authClientSecret)) {
  parent: vault
  name: authClientSecretName
  properties: {
    value: authClientSecret
    contentType: 'Entra client secret for App Service authentication'
  }
}

output name string = vault.name
