# "Complete Backup Workflow" from seed-backup-api.md, verbatim.
# 1. Create backup
BACKUP=$(curl -s -X POST "http://localhost:8081/backup/create?compress=true" \
  -H "Authorization: Bearer $ACCESS_TOKEN" | jq -r '.filename')

echo "Created backup: $BACKUP"

# 2. Download backup
curl -X GET "http://localhost:8081/backup/download/$BACKUP" \
  -H "Authorization: Bearer $ACCESS_TOKEN" \
  -o "$BACKUP"

echo "Downloaded backup to: $BACKUP"

# 3. Upload to S3 (optional)
aws s3 cp "$BACKUP" "s3://my-backups/$BACKUP"

echo "Uploaded to S3"
