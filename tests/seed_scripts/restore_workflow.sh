# "Restore Workflow" from seed-backup-api.md, verbatim but for the chosen backup name.
# 1. List available backups
curl -X GET "http://localhost:8081/backup/list" \
  -H "Authorization: Bearer $ACCESS_TOKEN" | jq

# 2. Choose a backup and restore
BACKUP="backup_postgresql_20241110_120000.sql.gz"

curl -X POST "http://localhost:8081/backup/restore/$BACKUP" \
  -H "Authorization: Bearer $ACCESS_TOKEN"

echo "Database restored from: $BACKUP"
