// The one identity of the app: storage (host and tables), deployment package, Key Vault,
// Application Insights and Azure OpenAI all trust it; no keys or connection strings needed.
param name string
param location string = resourceGroup().location
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output name string = identity.name
output principalId string = identity.properties.principalId
output clientId string = identity.properties.clientId
