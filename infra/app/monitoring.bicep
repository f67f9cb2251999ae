// Logs and traces: a Log Analytics workspace with Application Insights on top. Ingestion takes
// Entra tokens only (the app's identity holds Monitoring Metrics Publisher), no instrumentation key.
param logAnalyticsName string
param appInsightsName string
param location string = resourceGroup().location
param tags object = {}

@description('Daily ingestion cap in GB: a runaway log loop costs at most this much a day.')
param dailyQuotaGb int = 1

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 30
    workspaceCapping: {
      dailyQuotaGb: dailyQuotaGb
    }
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logs.id
    DisableLocalAuth: true
  }
}

output appInsightsName string = appInsights.name
