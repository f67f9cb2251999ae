// AI Proxy on Azure: a Flex Consumption Function app and what it needs, provisioned by `azd up`.
// Every resource lives in one resource group; the app reaches storage, Key Vault, Application
// Insights and (optionally) Azure OpenAI with one user-assigned identity, never with a key.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; a hash of it (with subscription and region) names every resource.')
param environmentName string

// Regions offering Flex Consumption, as Microsoft publishes them in its Flex Consumption azd
// templates (Azure-Samples/functions-quickstart-python-http-azd, infra/main.bicep: this list
// since 2025-05-06, unchanged at its 2025-11-24 state, read 2026-12-06). azd offers only these
// when it asks for a region, and Bicep refuses any other before anything is created. Flex
// reaches more regions over time: az functionapp list-flexconsumption-locations -o table lists
// them today; add one here to use it.
@minLength(1)
@allowed([
  'australiaeast'
  'australiasoutheast'
  'brazilsouth'
  'canadacentral'
  'centralindia'
  'centralus'
  'eastasia'
  'eastus'
  'eastus2'
  'eastus2euap'
  'francecentral'
  'germanywestcentral'
  'italynorth'
  'japaneast'
  'koreacentral'
  'northcentralus'
  'northeurope'
  'norwayeast'
  'southafricanorth'
  'southcentralus'
  'southeastasia'
  'southindia'
  'spaincentral'
  'swedencentral'
  'uaenorth'
  'uksouth'
  'ukwest'
  'westcentralus'
  'westeurope'
  'westus'
  'westus2'
  'westus3'
])
@description('Region of every resource; one that offers Flex Consumption.')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Object id of the person (or pipeline) running azd; gets data access for the CLI and local debugging. Empty: none.')
param principalId string = ''

@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
@description('Kind of principalId.')
param principalType string = 'User'

// The Fernet key that seals attendee keys (and upstream keys outside Key Vault). It comes from
// the azd environment (AIPROXY_ENCRYPTION_KEY) rather than from newGuid(): a default computed at
// deploy time would change on every `azd provision` and make every sealed value unreadable, and
// GUIDs hold too little randomness for a 32-byte key. The preprovision hook checks it is set and
// well formed; Bicep only stores it as a Key Vault secret that the app reads by reference.
@secure()
@minLength(44)
@maxLength(44)
@description('Fernet key: 32 random bytes, url-safe base64 (44 characters). Set once with azd env set AIPROXY_ENCRYPTION_KEY; never change it.')
param encryptionKey string

// The operator's credential: callers send it in the x-aiproxy-operator-key header and may then
// manage every event. Organisers never get it. The preprovision hook makes a random one when the
// azd environment has none (AIPROXY_OPERATOR_KEY); Bicep stores it as a Key Vault secret, and
// the app reads it by reference with its identity.
@secure()
@minLength(32)
@description('Operator key: at least 32 url-safe characters, made by the preprovision hook when AIPROXY_OPERATOR_KEY is empty. Read it afterwards with azd env get-value AIPROXY_OPERATOR_KEY.')
param operatorKey string

@minValue(40)
@maxValue(1000)
@description('Most instances the Function app scales out to; bounds the cost of a traffic spike. 40 is the lowest Flex Consumption documents outside preview regions (only those accept less), so less is refused here; 1000 is the highest.')
param maximumInstanceCount int = 100

@minValue(1)
@maxValue(1000)
@description('Concurrent HTTP calls one instance takes before another is added. Unset, Flex Consumption gives Python apps 1. The default comes from a measurement (docs/deploy.md, HTTP concurrency per instance).')
param httpPerInstanceConcurrency int = 64

// Always-ready instances count towards maximumInstanceCount. Bicep cannot compare two
// parameters before deploying (assert is experimental), so the preprovision hook refuses more.
@minValue(0)
@maxValue(1000)
@description('Always-ready instances for the HTTP functions, billed around the clock while set; 0: none (instances start on demand). At most maximumInstanceCount.')
param alwaysReadyInstanceCount int = 0

@description('Put Entra sign-in (App Service authentication) in front of the console and make the app trust its principal header.')
param authEnabled bool = false

@description('Application (client) id of the Entra app registration used for sign-in; required when authEnabled.')
param authClientId string = ''

@secure()
@description('Client secret of that app registration; stored in Key Vault. Empty: sign-in uses ID tokens only.')
param authClientSecret string = ''

@description('Object ids of Entra groups whose members manage their own events with a token for the sign-in app registration, commas; empty (and no roles): no organiser signs in with a token.')
param organizerGroups string = ''

@description('App roles of the sign-in app registration that make a principal an organiser, commas.')
param organizerRoles string = ''

@description('Object ids of Entra groups whose members are operators (every event) with a token for the sign-in app registration, commas; empty (and no roles): only the operator key is an operator.')
param operatorGroups string = ''

@description('App roles of the sign-in app registration that make a principal an operator, commas (for example Operator).')
param operatorRoles string = ''

@description('Upstream hosts organisers may name beyond Azure AI services (.openai.azure.com, .cognitiveservices.azure.com, .services.ai.azure.com, .search.windows.net): exact hosts or .suffixes, each optionally :port, commas; e.g. your own API Management gateway.')
param upstreamHosts string = ''

@description('Hosts MCP servers may be on (exact hosts or .suffixes, each optionally :port, commas); empty: any public https host on port 443.')
param mcpHosts string = ''

@description('Create an Azure OpenAI account with the deployments below, which the app calls with its identity.')
param createOpenAi bool = false

@description('Region of the Azure OpenAI account (model availability differs by region). Empty: the main region.')
param openAiLocation string = ''

@description('Model deployments for the Azure OpenAI account: name, model, version, sku (GlobalStandard, Standard, ...), capacity (thousands of tokens per minute).')
param openAiDeployments array = []

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
var functionAppName = 'func-api-${resourceToken}'
var deploymentContainerName = 'app-package-${resourceToken}'
var encryptionKeySecretName = 'aiproxy-encryption-key'
var operatorKeySecretName = 'aiproxy-operator-key'
var authClientSecretName = 'aiproxy-auth-client-secret'
var openAiAccountName = 'oai-${resourceToken}'

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity './app/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-api-${resourceToken}'
    location: location
    tags: tags
  }
}

module storage './app/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    deploymentContainerName: deploymentContainerName
  }
}

module monitoring './app/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: 'log-${resourceToken}'
    appInsightsName: 'appi-${resourceToken}'
    location: location
    tags: tags
  }
}

module keyVault './app/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: 'kv-${resourceToken}'
    location: location
    tags: tags
    encryptionKeySecretName: encryptionKeySecretName
    encryptionKey: encryptionKey
    operatorKeySecretName: operatorKeySecretName
    operatorKey: operatorKey
    authClientSecretName: authClientSecretName
    authClientSecret: authClientSecret
  }
}

module openAi './app/openai.bicep' = if (createOpenAi) {
  name: 'openai'
  scope: rg
  params: {
    name: openAiAccountName
    location: empty(openAiLocation) ? location : openAiLocation
    tags: tags
    deployments: openAiDeployments
    identityPrincipalId: identity.outputs.principalId
    userPrincipalId: principalId
    userPrincipalType: principalType
  }
}

module rbac './app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    identityPrincipalId: identity.outputs.principalId
    userPrincipalId: principalId
    userPrincipalType: principalType
    storageAccountName: storage.outputs.name
    keyVaultName: keyVault.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

module api './app/api.bicep' = {
  name: 'api'
  scope: rg
  params: {
    name: functionAppName
    planName: 'plan-${resourceToken}'
    location: location
    tags: tags
    identityName: identity.outputs.name
    storageAccountName: storage.outputs.name
    deploymentContainerName: deploymentContainerName
    keyVaultName: keyVault.outputs.name
    encryptionKeySecretName: encryptionKeySecretName
    operatorKeySecretName: operatorKeySecretName
    appInsightsName: monitoring.outputs.appInsightsName
    maximumInstanceCount: maximumInstanceCount
    httpPerInstanceConcurrency: httpPerInstanceConcurrency
    alwaysReadyInstanceCount: alwaysReadyInstanceCount
    authEnabled: authEnabled
    authClientId: authClientId
    authClientSecretName: empty(authClientSecret) ? '' : authClientSecretName
    organizerGroups: organizerGroups
    organizerRoles: organizerRoles
    operatorGroups: operatorGroups
    operatorRoles: operatorRoles
    upstreamHosts: upstreamHosts
    mcpHosts: mcpHosts
  }
  // The identity must hold its roles before the host starts: it reads its deployment package,
  // host storage and the encryption key with them.
  dependsOn: [
    rbac
    openAi
  ]
}

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_NAME string = api.outputs.name
output SERVICE_API_NAME string = api.outputs.name
output AIPROXY_URL string = api.outputs.url
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AIPROXY_STORAGE_TABLE_ENDPOINT string = storage.outputs.tableEndpoint
output AZURE_OPENAI_ENDPOINT string = createOpenAi ? 'https://${openAiAccountName}.openai.azure.com/' : ''
